"""What an executor's reply becomes on disk: the artifact's bytes, extension and hash.

Text and documents are Markdown; `CODE_GENERATION` keeps the code itself (the first fenced
block), named by its language.
"""

from __future__ import annotations

import hashlib
import re

from factory.models import FunctionType

_FENCE = re.compile(r"```([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)

CODE_EXTENSIONS = {
    "python": ".py", "py": ".py", "javascript": ".js", "js": ".js", "typescript": ".ts", "ts": ".ts",
    "tsx": ".tsx", "jsx": ".jsx", "rust": ".rs", "rs": ".rs", "go": ".go", "golang": ".go", "java": ".java",
    "kotlin": ".kt", "c": ".c", "cpp": ".cpp", "c++": ".cpp", "csharp": ".cs", "c#": ".cs", "cs": ".cs",
    "ruby": ".rb", "rb": ".rb", "php": ".php", "swift": ".swift", "scala": ".scala", "bash": ".sh",
    "sh": ".sh", "shell": ".sh", "sql": ".sql", "html": ".html", "css": ".css", "json": ".json",
    "yaml": ".yaml", "yml": ".yaml", "toml": ".toml", "lua": ".lua", "r": ".r", "haskell": ".hs",
}


# Generated media, by the MIME type its provider returned.
MEDIA_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "audio/mpeg": ".mp3",
                    "audio/wav": ".wav", "audio/x-wav": ".wav", "video/mp4": ".mp4"}


def render(function: FunctionType, reply: str) -> tuple[str, str]:
    """The artifact text and file extension for an executor's reply."""
    if function is FunctionType.CODE_GENERATION:
        match = _FENCE.search(reply)
        if match:
            language = match.group(1).lower()
            return match.group(2), CODE_EXTENSIONS.get(language, ".txt")
        return reply, ".txt"
    return reply, ".md"


def sha256(data: bytes) -> str:
    """The hex SHA-256 of an artifact's bytes: its `artifact_hash`."""
    return hashlib.sha256(data).hexdigest()
