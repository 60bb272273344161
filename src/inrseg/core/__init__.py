"""The bottom layer: errors, progress and status lines, seeded generators. Imports nothing of inrseg."""
