"""Model backends behind one async interface: complete(request) -> completion."""
