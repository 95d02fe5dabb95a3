"""Closed-loop evaluation in simulators (`xwam evaluate --sim NAME`)."""
