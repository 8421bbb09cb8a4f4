"""Frozen features of WALT runs: extraction (`extract`, compute only), the HDF5 feature file
(`h5`, the format: writer and reader) and a dump end to end (`dump`). See DESIGN 2.2 and 2.4."""
from walt.features.extract import KINDS, LATENT, Backbone, extract, feature_key
from walt.features.h5 import FORMAT, FeatureFile, FeatureFileError, FeatureWriteError, FeatureWriter, join_shards

__all__ = ["Backbone", "FORMAT", "FeatureFile", "FeatureFileError", "FeatureWriteError", "FeatureWriter", "KINDS",
           "LATENT", "extract", "feature_key", "join_shards"]
