//! The read-only dashboard: server-rendered HTML and SVG pages over the runs' tables and the
//! dead-letter queue (to be built).
