"""Filter, then weigh, then claim (DESIGN.md section 4)."""
