// libevent objects owned by std::unique_ptr, and their creation checked:
// event_new and friends return NULL on failure (no memory, a bad fd), which
// must not become a crash in event_add later.
#pragma once
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include <memory>

namespace shimlet {

template <typename T, void (*F)(T*)>
struct LibeventFree {
  void operator()(T* p) const { F(p); }
};
using EventBasePtr = std::unique_ptr<event_base, LibeventFree<event_base, event_base_free>>;
using EventPtr = std::unique_ptr<event, LibeventFree<event, event_free>>;
using EvBufferPtr = std::unique_ptr<evbuffer, LibeventFree<evbuffer, evbuffer_free>>;
// Freeing a bufferevent made with BEV_OPT_CLOSE_ON_FREE closes its socket
// (and frees its SSL).
using BufferEventPtr = std::unique_ptr<bufferevent, LibeventFree<bufferevent, bufferevent_free>>;

// The same as event_base_new, event_new (evtimer_new: fd -1, what 0;
// evsignal_new: fd = the signal, EV_SIGNAL | EV_PERSIST) and evbuffer_new,
// throwing shimlet::Error instead of returning NULL.
EventBasePtr new_event_base();
EventPtr new_event(event_base* base, evutil_socket_t fd, short what, event_callback_fn cb, void* arg);
EventPtr new_timer(event_base* base, event_callback_fn cb, void* arg);
EvBufferPtr new_evbuffer();

}  // namespace shimlet
