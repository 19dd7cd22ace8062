"""Reading runs back: summaries, the search tree, transcripts and reports, from the store."""
