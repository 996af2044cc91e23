//! Pure: the route table schema, its validation, lookup and the sources it is read from.

pub mod discover;
pub mod document;
pub mod follow;
pub mod image;
pub(crate) mod json;
pub mod limits;
pub mod share;
pub mod source;
pub mod table;

pub use json::Json;
