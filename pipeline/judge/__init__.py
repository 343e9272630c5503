"""The judge: rubric, versioned templates, strict parsers and the judging session (UltraFeedback protocol)."""
