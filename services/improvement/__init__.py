"""The improvement service: assessment, patterns, feedback, versioned prompts with rollback."""

from services.improvement.admin import list_versions, request_rollback

__all__ = ["list_versions", "request_rollback"]
