// shimctl: see client/client.h.
#include "client/client.h"
#include "common/exit.h"

// Everything is written and the terminal restored by now (client::main's
// scopes have ended).
int main(int argc, char** argv) { shimlet::exit_without_teardown(shimlet::client::main(argc, argv)); }
