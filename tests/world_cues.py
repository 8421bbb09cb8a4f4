"""What one frame of a world clip gives away: per-frame state read off the annotations `render_clip`
returns, and a small classifier to read labels from it (used by tests/test_world_cues.py and by
the numbers in docs/data.md)."""
import numpy as np
import torch

from walt.data.world import LABEL_NAMES

TASKS = list(LABEL_NAMES)


def states(c, ref=None):
    """(T, F) state of every frame t, with 3D quantities in the axes of camera ref[t] (default: its
    own camera, which is all one frame shows; a pair of frames is compared in the first one's axes,
    as a video shows, through the static scene, how the camera moved):

    main object: box centre and size (image fractions), box validity, height of its centre above the
    ground (per metre of distance), its centre (x / z, y / z, log z) and orientation, how far it has
    turned, and its distance from the camera; camera: its centre and
    axes, and the world's up direction (pitch and roll); the other objects: centre and heading
    (zeros for empty slots); for every object, how far it has turned about its vertical since frame
    ref[t]; and the main object's shape (one-hot), which shows in any frame."""
    T, H, W = c["video"].shape[:3]
    ref = np.arange(T) if ref is None else np.asarray(ref)
    c2w = c["cam_to_world"].astype(np.float64)
    o2w = c["object_to_world"].astype(np.float64)
    Rr, er = c2w[ref, :3, :3], c2w[ref, :3, 3]  # (T, 3, 3), (T, 3)
    to_ref = lambda p: np.einsum("tji,t...j->t...i", Rr, p - er.reshape(T, *([1] * (p.ndim - 2)), 3))  # noqa: E731
    rot_ref = lambda R: np.einsum("tji,t...jk->t...ik", Rr, R)  # noqa: E731
    box = c["boxes"][:, 0].astype(np.float64) / [W, H, W, H]
    pos, Ro = o2w[..., :3, 3], o2w[..., :3, :3]  # (T, O, 3), (T, O, 3, 3)
    p = to_ref(pos)
    orient = rot_ref(Ro)
    # how each object has turned since frame ref[t] (a video shows it by its surface pattern)
    turned = np.einsum("t...ji,t...jk->t...ik", Ro[ref], Ro)[..., :2, 0]  # (T, O, 2)
    cam_c, cam_R = to_ref(c2w[:, :3, 3]), rot_ref(c2w[:, :3, :3])
    up = np.einsum("tji,j->ti", c2w[:, :3, :3], [0.0, 0.0, 1.0])
    n_cls = len(LABEL_NAMES["object"])
    dist = np.linalg.norm(pos[:, 0] - c2w[:, :3, 3], axis=1)[:, None]
    persp = np.stack([p[:, 0, 0] / p[:, 0, 2], p[:, 0, 1] / p[:, 0, 2], np.log(p[:, 0, 2])], 1)  # as an image shows it
    parts = [(box[:, :2] + box[:, 2:]) / 2, box[:, 2:] - box[:, :2], c["box_valid"][:, :1], pos[:, 0, 2:] / dist,
             persp, orient[:, 0, :, :2].reshape(T, 6), turned[:, 0], dist,
             cam_c, cam_R.reshape(T, 9), up, c2w[:, 2:3, 3]]
    for k in range(1, len(c["object_present"])):
        f = np.concatenate([p[:, k], orient[:, k, :, 0], turned[:, k], np.ones((T, 1))], 1)
        parts.append(f if c["object_present"][k] else np.zeros((T, 9)))
    parts.append(np.broadcast_to(np.eye(n_cls)[c["object_class"][0]], (T, n_cls)))
    return np.concatenate(parts, 1)


OBJECT = slice(0, 18)  # the main object's part of a state
MAIN = slice(0, 34)  # the main object's and the camera's part
OTHERS = slice(34, None)  # the other objects and the main object's shape


def single_and_pair(c, a=0, b=-1):
    """(T, F) single-frame states and the (2F,) state of the frame pair (a, b) in camera a's axes,
    written as (state a, state b - state a): the same numbers, in a form a small classifier fits."""
    T = len(c["video"])
    both = states(c, np.full(T, a % T))
    return states(c), np.concatenate([both[a], both[b] - both[a]])


def part(x, which):
    """Columns `which` (MAIN or OTHERS) of single-frame states (..., F) or pair states (..., 2F)."""
    F = 34 + 9 * 3 + 6
    idx = np.arange(F)[which]
    if x.shape[-1] == 2 * F:
        idx = np.concatenate([idx, idx + F])
    return x[..., idx]


def fit_accuracy(x, y, n_classes, hidden=64, epochs=500, lr=1e-2, wd=1e-2, folds=4, seed=0):
    """Accuracy of small MLPs (two hidden ReLU layers; hidden=0: logistic regression) trained with
    Adam on standardized inputs, by `folds`-fold cross-validation (clip i is tested in fold i % folds),
    so every clip is tested once. x: (N, F), or (G, N, F) for G independent problems fitted at once
    (one per frame index, say); returns a float or a (G,) array."""
    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    single = x.ndim == 2
    x = x[None] if single else x
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    G, N, F = x.shape
    correct = torch.zeros(G)
    for fold in range(folds):
        test = torch.arange(N) % folds == fold
        xtr, ytr = x[:, ~test], y[~test]
        mu, sd = xtr.mean(1, keepdim=True), xtr.std(1, keepdim=True) + 1e-6
        xtr, xte = (xtr - mu) / sd, (x[:, test] - mu) / sd
        dims = [F, hidden, hidden, n_classes] if hidden else [F, n_classes]
        params = []
        for a, b in zip(dims[:-1], dims[1:]):
            params += [(torch.randn(G, a, b) / a**0.5).requires_grad_(), torch.zeros(G, 1, b, requires_grad=True)]

        def net(z):
            for i in range(0, len(params), 2):
                z = torch.baddbmm(params[i + 1], z, params[i])
                z = torch.relu(z) if i + 2 < len(params) else z
            return z

        opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
        for _ in range(epochs):
            opt.zero_grad()
            # a sum over the G problems, so each trains as if alone
            (G * torch.nn.functional.cross_entropy(net(xtr).reshape(-1, n_classes), ytr.repeat(G))).backward()
            opt.step()
        with torch.no_grad():
            correct += (net(xte).argmax(-1) == y[test]).float().sum(1)
    acc = (correct / N).numpy()
    return float(acc[0]) if single else acc


def texture_crops(c, size=16):
    """(size, size) grey crop of the main object's box in frame 0 (object pixels only, the rest set
    to their mean), contrast-normalized, for reading its surface pattern."""
    img = c["video"][0].astype(np.float32).mean(-1)
    m = c["mask"][0] == 1
    if not m.any():
        return np.zeros((size, size), np.float32)
    ii, jj = np.nonzero(m)
    v = img[m]
    g = np.where(m, (img - v.mean()) / (v.std() + 1e-3), 0.0)[ii.min():ii.max() + 1, jj.min():jj.max() + 1]
    t = torch.as_tensor(g, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def texture_features(crops):
    """Crop pixels and the magnitude of their 2D spectrum (which ignores where the pattern starts)."""
    spec = np.abs(np.fft.rfft2(crops)).reshape(len(crops), -1)
    return np.concatenate([crops.reshape(len(crops), -1), spec], 1)
