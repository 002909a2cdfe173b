"""Leaf helpers every layer may use: storage URIs and node-local copies (`storage`), atomic local writes
(`atomic`), quiet third-party logs (`quiet`), number formatting (`formatting`). Imports nothing of the project."""
