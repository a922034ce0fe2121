"""Floor 1, the subscriber side in Python: a stream that resumes by itself, and the transcript that proves
what it received (every event once, in order, and each completed text's length and SHA-256)."""

from tokenfan.client.stream import Credential, SessionStream
from tokenfan.client.transcript import GenerationTranscript, Transcript, TranscriptError

__all__ = ["Credential", "GenerationTranscript", "SessionStream", "Transcript", "TranscriptError"]
