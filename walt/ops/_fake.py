"""The one check the ops' fake kernels make: every tensor on the first one's device.

A call that mixes meta tensors with real ones is dispatched to the fake kernel (Meta outranks
every backend), so the op's own checks (csrc/*/checks.cpp) never see it, and the fake kernel would
return an uninitialized tensor on the first tensor's device. The op refuses every other mix of
devices in the same words.
"""


def check_devices(op, first_name, first, **tensors):
    for name, x in tensors.items():
        if x is not None and x.device != first.device:
            raise ValueError(f"{op}: {name} must be on {first_name}'s device {first.device}, got {x.device}.")
