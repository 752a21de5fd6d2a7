"""The trio runtime of a node: discovery, signaling, WebRTC transport and the node itself."""
