"""Fleet simulator: realistic wire records for the programme."""
