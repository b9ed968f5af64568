//! The uplink to the cloud broker. So far: the bridge rules (`rules`), which decide what goes up
//! and what comes down and how topics are renamed. The upstream session itself is
//! `proto::mqtt::client`; the driver that joins them to the outbox comes with issue 4.

pub mod rules;
