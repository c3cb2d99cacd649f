"""What shows a run: metrics tracking and the HTML report."""
