// HOST[:PORT] as URLs and endpoint lists write it: a name, an IPv4 address
// or an [IPv6] address, then an optional port 1..65535. Shared by the
// master URLs of masterclient and the etcd endpoints of etcd/.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace shimlet {

struct HostPort {
  std::string host;              // without the brackets of an IPv6 address
  std::optional<uint16_t> port;  // absent when not written
};

// Throws shimlet::Error with the reason alone ("unterminated [IPv6]", "port
// must be 1-65535", ...); the caller says which URL. No user info, path or
// query: the caller has cut those off or refused them.
HostPort parse_host_port(std::string_view s);

}  // namespace shimlet
