"""The search's own language: its values, the reward rule, the agents' requests and replies, and
the search's events. Nothing here imports anything of drpo's, so every other layer (the bus that
carries these values, the store that keeps them, the views that read them) can depend on it.

* :mod:`drpo.domain.values`: ICL examples, aspect selections, scores, critiques and the reward rule;
* :mod:`drpo.domain.requests`: what each agent is asked and what it answers;
* :mod:`drpo.domain.events`: what the search publishes as it goes (nodes, levels, the outcome);
* :mod:`drpo.domain.messages`: all of the above as one tagged union, for reading them back.
"""
