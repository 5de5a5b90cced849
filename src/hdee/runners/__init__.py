"""Where jobs run. Runners only execute a job graph; they know nothing of the method."""
