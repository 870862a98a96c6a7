"""Open-loop load generator, SLO sweeps, reports and plots."""
