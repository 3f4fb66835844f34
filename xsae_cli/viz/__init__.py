"""Plots and offline HTML dashboards from the files the other groups write.

Viz only reads files (embeddings JSON, run folders, features JSON), so results made on a cluster
can be plotted on a laptop; it imports no training code and no torch.
"""
