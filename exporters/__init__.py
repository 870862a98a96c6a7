"""Offline side: data, feature tables, training, export, index build, releases."""
