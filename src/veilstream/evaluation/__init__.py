"""Privacy evaluation: a labelled set of faces and plates, and what the published frames leave visible."""
