pub mod routes;
pub mod sniff;
