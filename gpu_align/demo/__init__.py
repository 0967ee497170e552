"""The embedded demo: the real face photos the installed packages ship (:mod:`.photos`) and the VGGFace2-like
dataset built from them (:mod:`.data`)."""
