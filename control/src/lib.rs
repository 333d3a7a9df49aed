//! Control plane of the actrix appliance (Key Server, Actor Identity Service, HTTP server).
