// shimctl: see client/client.h.
#include "client/client.h"

int main(int argc, char** argv) { return shimlet::client::main(argc, argv); }
