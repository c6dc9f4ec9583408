"""Studies: one phenomenon on one model, end to end, saved so its figures and tables regenerate."""
