"""Leaf helpers every layer may use: storage URIs, node-local copies and the project's cache root (`storage`),
atomic local writes (`atomic`), quiet third-party logs (`quiet`), number formatting (`formatting`). Imports nothing
of the project."""
