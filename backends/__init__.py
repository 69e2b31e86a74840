"""Backends: each legalizes first (lists every node it cannot translate), then lowers and runs."""
