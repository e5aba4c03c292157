"""Pure pipeline logic: extraction, retrieval, evolution. No I/O of its own."""
