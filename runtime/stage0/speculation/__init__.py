"""Speculation on stage 0: config tables → resolved settings → each request's plan, and the draft."""
