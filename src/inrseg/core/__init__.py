"""The bottom layer: errors, files written atomically and locks, memory checks, progress and
status lines, seeded generators. Imports nothing of inrseg outside core."""
