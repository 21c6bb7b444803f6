"""The research studies: sweeps' reports, tables and plots over finished runs."""
