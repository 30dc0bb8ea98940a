"""Media in and out: PyAV video/audio I/O on one 25 fps / 16 kHz timeline (`io`) and
the audio features the models take (`audio`: Wav2Lip log-mel windows, energy)."""
