"""Seed data shipped with drpo (written by the drpo authors)."""
