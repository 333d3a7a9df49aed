//! Actrix WebSocket signaling hub. Not yet implemented: see the signaling issue.
