"""drpo: Dynamic Rewarding with Prompt Optimization as an asynchronous, event-driven agent system."""

__version__ = "0.1.0"
