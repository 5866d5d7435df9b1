"""The improvement service: assessment, patterns, feedback, versioned prompts with rollback."""
