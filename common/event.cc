#include "common/event.h"

#include "common/error.h"

namespace shimlet {

EventBasePtr new_event_base() {
  EventBasePtr b(event_base_new());
  if (!b) throw Error("event_base_new failed");
  return b;
}

EventPtr new_event(event_base* base, evutil_socket_t fd, short what, event_callback_fn cb, void* arg) {
  EventPtr e(event_new(base, fd, what, cb, arg));
  if (!e) throw Error("event_new failed (fd " + std::to_string(fd) + ")");
  return e;
}

EventPtr new_timer(event_base* base, event_callback_fn cb, void* arg) { return new_event(base, -1, 0, cb, arg); }

EvBufferPtr new_evbuffer() {
  EvBufferPtr b(evbuffer_new());
  if (!b) throw Error("evbuffer_new failed");
  return b;
}

}  // namespace shimlet
