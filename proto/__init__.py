"""Control protocol and activation stream (layerline.stage.v1)."""
