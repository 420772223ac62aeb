"""Speculation on stage 0: config tables → resolved settings → served with a draft → each request's plan."""
