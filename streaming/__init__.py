"""Media sources and sinks: files, microphone, WebRTC."""
