"""Generation backends behind one protocol (engines/base.py): SGLang for GPU clusters, embedded HF for anywhere."""
