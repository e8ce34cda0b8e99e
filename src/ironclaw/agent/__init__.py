"""The agent's host side: the model gateway, the approval cliff, the trace and the task
runner that drives an agent loop inside a sandbox. The loop itself runs in the guest."""
