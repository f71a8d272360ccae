/*
 * The pod sandbox's process (the "pause" container every pod of the kubelet cluster starts
 * first; tests/src/kubelet/image.rs builds it with `cc -static` into the pause image). It holds
 * the pod's namespaces open, reaps the zombies of a shared PID namespace, and exits on SIGINT or
 * SIGTERM: what Kubernetes' own build/pause/linux/pause.c does, without its version flag.
 */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = stop;
    if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0) {
        return 1;
    }
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP;
    if (sigaction(SIGCHLD, &sa, NULL) < 0) {
        return 2;
    }
    for (;;) {
        pause();
    }
}
