"""Training data: clips -> prepared folders (`prepare`), prepared folders -> windows of
pixels or cached latents (`datasets`), and what each training stage sees, in which
order (`windows`).

`datasets` and `windows` must import on a bare GPU machine: no mediapipe, no PyAV at
module level (they use the mediapipe-free `tccp.face.sketch` / `tccp.face.geometry`).
"""
