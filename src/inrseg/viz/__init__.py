"""The only place matplotlib is imported: plots, overlays, plane renderings and the HTML reports."""
