"""Programme evaluation (EBPM): care-data linkage, matched comparisons, the plan's indicators."""
