"""Alignment methods: one component per file (docs/method.md, "Alignment methods")."""
