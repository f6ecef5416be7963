"""Edge of the system: decode and validate wire records, and the embedded durable log."""
